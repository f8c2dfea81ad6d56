"""An OpenAI-compatible HTTP server on rank 0; the other ranks follow each request.

- Rank 0, a thread per connection (``Handler``; no MPI): parses and tokenizes a request,
  queues it as a ``Job``, relays its events (``Text``* then ``Done`` or ``Failed``).
- Rank 0, main thread (``App.run``, the engine): runs the jobs one at a time in arrival order
  with the followers (``comm.send_command``, then ``generate``). A job that cannot start fails
  alone, before any collective; an exception inside ``generate`` (a rank died) ends the job.
  After every token and prefill chunk it stops the job if its client has gone or SIGINT/
  SIGTERM came (then queued clients get a 503, followers are told to quit, all exit 0).
- Other ranks (``follow``): sleep in ``comm.wait_command``, run each generation, quit when told.
"""
from __future__ import annotations

import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mpitpi.errors import MpitpiError
from mpitpi.generate import Result, Session, check_prompt, generate
from mpitpi.sampling import BadOption, Sampler, SamplingParams

MAX_BODY = 8 * 2**20   # bytes of a request body
STATIC = os.path.join(os.path.dirname(__file__), "static")
ROUTES = {"/health": "GET", "/": "GET", "/index.html": "GET", "/v1/models": "GET",
          "/v1/chat/completions": "POST", "/v1/completions": "POST"}
ALLOW = {"GET": "GET, HEAD, OPTIONS", "POST": "POST, OPTIONS"}


class BadRequest(Exception):
    """An answer other than 200, with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str | None = None, code: str | None = None):
        super().__init__(message)
        kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Text:      # a piece of final text, as soon as it is made
    text: str


@dataclass
class Done:      # the generation ended (not cancelled)
    result: Result


@dataclass
class Failed:    # the request failed, with this HTTP status
    message: str
    status: int = 500


@dataclass
class Job:
    """One request, from its parsed body to its last event."""
    chat: bool
    prompt: str | list[dict]     # completions: the prompt; chat: the messages
    max_tokens: int | None       # None until App.submit: the server's default
    params: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool
    ids: list[int] = field(default_factory=list)               # the tokenized prompt
    events: queue.Queue = field(default_factory=queue.Queue)   # Text* then Done or Failed
    gone: Callable[[], bool] = lambda: False                   # the client has left


def _number(body: dict, key: str, integer: bool = False, default=None) -> int | float | None:
    """body[key] as an int or a float, ``default`` when absent; 400 for other JSON types."""
    v = body.get(key)
    try:
        if v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and not (
                integer and isinstance(v, float) and not v.is_integer()):
            return default if v is None else int(v) if integer else float(v)
    except OverflowError:   # float(10**400)
        pass
    raise BadRequest(400, f"'{key}' must be {'an integer' if integer else 'a finite number'}, "
                     f"got {json.dumps(v)}.", key)


def parse_sampling(body: dict) -> SamplingParams:
    """The request's SamplingParams, checked; temperature 1 when absent (OpenAI's default)."""
    penalty = "repeat_penalty" if body.get("repetition_penalty") is None else "repetition_penalty"
    try:
        return SamplingParams(
            temperature=_number(body, "temperature", default=1.0),
            top_k=_number(body, "top_k", True, 0), top_p=_number(body, "top_p", default=1.0),
            min_p=_number(body, "min_p", default=0.0),
            repeat_penalty=_number(body, penalty, default=1.0),
            seed=_number(body, "seed", True)).check()
    except BadOption as e:
        param = {"repeat_penalty": "repetition_penalty"}.get(e.field, e.field)
        raise BadRequest(400, f"invalid '{param}': {e}", param)


def parse_request(body: dict, chat: bool) -> Job:
    """Every option of a /v1/chat/completions (``chat``) or /v1/completions body, checked."""
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not (isinstance(stops, list) and len(stops) <= 4 and all(isinstance(s, str) for s in stops)):
        raise BadRequest(400, "'stop' must be a string or a list of at most 4 strings.", "stop")
    if not isinstance(stream := body.get("stream", False), bool):
        raise BadRequest(400, "'stream' must be true or false.", "stream")
    if body.get("n", 1) != 1:
        raise BadRequest(400, "only 'n': 1 is supported.", "n")
    if not isinstance(so := body.get("stream_options") or {}, dict):
        raise BadRequest(400, "'stream_options' must be an object.", "stream_options")
    key = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
    if (max_tokens := _number(body, key, integer=True)) is not None and max_tokens < 1:
        raise BadRequest(400, f"'{key}' must be >= 1, got {max_tokens}.", "max_tokens")
    prompt = p[0] if isinstance(p := body.get("prompt"), list) and len(p) == 1 else p
    if not chat and not (isinstance(prompt, str) and prompt):
        raise BadRequest(400, "'prompt' must be a non-empty string.", "prompt")
    return Job(chat, parse_messages(body) if chat else prompt, max_tokens,
               parse_sampling(body), stops, stream, bool(so.get("include_usage", False)))


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest(400, "'messages' must be a non-empty list.", "messages")
    out = []
    for i, m in enumerate(msgs):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(   # [{"type": "text", "text": ...}, ...]
                isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                for c in content):
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(400, f"messages[{i}] needs a 'role' (system, user or assistant) and "
                             "a 'content' string or list of text parts.", "messages")
        out.append({"role": m["role"], "content": content})
    return out


class Reply:
    """The API objects of one completion (chat or text): stream chunks, or the whole."""

    def __init__(self, model: str, chat: bool, include_usage: bool):
        self.chat, self.include_usage = chat, include_usage
        self.kind = "chat.completion" if chat else "text_completion"
        self.base = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                     "created": int(time.time()), "model": model}

    def chunk(self, choice: dict, finish: str | None = None, **more) -> dict:
        return {**self.base, "object": self.kind + (".chunk" if self.chat else ""), **more,
                "choices": [{"index": 0, **choice, "finish_reason": finish}]}

    def delta(self, text: str) -> dict:
        return self.chunk({"delta": {"content": text}} if self.chat else
                           {"text": text, "logprobs": None})

    def end(self, res: Result) -> list[dict]:
        usage, timings = self.stats(res)
        last = self.chunk({"delta": {}} if self.chat else {"text": "", "logprobs": None},
                           res.finish_reason, timings=timings)
        usage = {**self.base, "object": last["object"], "choices": [], "usage": usage}
        return [last, usage] if self.include_usage else [last]

    def whole(self, res: Result) -> dict:
        usage, timings = self.stats(res)
        choice = ({"message": {"role": "assistant", "content": res.text}} if self.chat else
                  {"text": res.text, "logprobs": None})
        return {**self.base, "object": self.kind, "usage": usage, "timings": timings,
                "choices": [{"index": 0, **choice, "finish_reason": res.finish_reason}]}

    @staticmethod
    def stats(res: Result) -> tuple[dict, dict]:   # usage, timings
        n, p = len(res.token_ids), res.prompt_tokens
        return ({"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n},
                {"ttft_ms": round(res.ttft_ms, 1), "ms_per_token": round(res.ms_per_token, 2)})


@dataclass
class ServeOptions:
    name: str                       # the model's id in the API
    host: str = "127.0.0.1"
    port: int = 8000                # 0: any free port
    api_key: str | None = None
    default_max_tokens: int = 512   # completion length when a request gives none
    cors_origins: list[str] = field(default_factory=list)   # web origins allowed; '*': any
    stall_after: float = 5.0        # /health says "stalled" after this long without progress


class App:
    """Rank 0's state, shared by the handler threads and the engine (the main thread)."""

    def __init__(self, comm, loaded, tokenizer, opts: ServeOptions):
        self.comm, self.loaded, self.tok, self.opts = comm, loaded, tokenizer, opts
        self.jobs: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.created = int(time.time())
        self.busy = False          # the engine is inside a generation
        self.last_progress = 0.0   # monotonic time of its last token or prefill chunk
        self.longest_gap = 0.0     # the longest wait for progress seen so far

    def submit(self, job: Job) -> None:
        """Handler thread: queue the tokenized ``job``; 400 if it exceeds the context."""
        ctx, n = self.loaded.args.max_seq_len, len(job.ids)
        if job.max_tokens is None:
            job.max_tokens = max(1, min(self.opts.default_max_tokens, ctx - n))
        if n + job.max_tokens > ctx:
            raise BadRequest(400, f"the prompt ({n} tokens) plus max_tokens ({job.max_tokens}) "
                             f"exceeds this model's context of {ctx} tokens.",
                             "max_tokens" if n < ctx else "messages" if job.chat else "prompt",
                             code="context_length_exceeded")
        if self.stopping.is_set():
            raise BadRequest(503, "the server is shutting down.")
        self.jobs.put(job)

    def health(self) -> tuple[int, dict]:
        """Any thread: 200 "ok"; 503 "stopping", or "stalled" when a generation has made no
        progress for ``stall_after`` s (and 3 times the longest wait seen: slow models)."""
        idle, ranks = time.monotonic() - self.last_progress, self.comm.size
        if self.stopping.is_set():
            return 503, {"status": "stopping", "ranks": ranks}
        if self.busy and idle > max(self.opts.stall_after, 3 * self.longest_gap):
            return 503, {"status": "stalled", "ranks": ranks, "idle_s": round(idle, 1)}
        return 200, {"status": "ok", "ranks": ranks}

    def _tick(self, job: Job) -> bool:
        """Session.cancel (engine thread, after each token and prefill chunk): True to stop."""
        self.longest_gap = max(self.longest_gap, (now := time.monotonic()) - self.last_progress)
        self.last_progress = now
        return self.stopping.is_set() or job.gone()

    def _session(self, job: Job) -> Session | None:
        """Engine thread, before any collective: the job's Session, or None (and Failed)."""
        args = self.loaded.args
        try:
            if job.gone():
                return job.events.put(Failed("the client has left.", 499))
            check_prompt(job.ids, job.max_tokens, args.vocab_size, args.max_seq_len)
            return Session(job.ids, job.max_tokens, Sampler(job.params), args.eos_token_ids,
                           self.tok.decode, job.stops, on_text=lambda t: job.events.put(Text(t)),
                           cancel=lambda: self._tick(job))
        except MpitpiError as e:
            job.events.put(Failed(str(e), 400))
        return None

    def run(self) -> None:
        """Rank 0's main thread: run queued jobs with the followers until stopping, then fail
        the rest and tell the followers to quit. Collective errors are re-raised."""
        while not self.stopping.is_set():
            try:
                job = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            if (session := self._session(job)) is None:
                continue
            self.last_progress, self.busy = time.monotonic(), True
            try:
                self.comm.send_command({"op": "generate"})
                res = generate(self.comm, self.loaded.model, session)
                why = ("the server is shutting down.", 503) if self.stopping.is_set() else (
                    "the client has left.", 499)   # 499: nginx's "client closed request"
                job.events.put(Failed(*why) if res.finish_reason == "cancelled" else Done(res))
            except BaseException as e:
                job.events.put(Failed(f"generation failed: {e}"))
                raise
            finally:
                self.busy = False
        while not self.jobs.empty():
            self.jobs.get().events.put(Failed("the server is shutting down.", 503))
        self.comm.send_command({"op": "quit"})


def follow(comm, loaded) -> None:
    """Ranks other than 0: run each generation rank 0 starts, until told to quit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # rank 0 leads the shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while comm.wait_command()["op"] != "quit":
        generate(comm, loaded.model, None)


def closed(sock: socket.socket) -> bool:
    """True when the peer of ``sock`` has closed or reset it; never blocks, reads nothing."""
    try:
        (p := select.poll()).register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(p.poll(0)) and not sock.recv(1, socket.MSG_PEEK)
    except (OSError, ValueError):   # ValueError: closed on this side
        return True


class HTTPServer(ThreadingHTTPServer):
    """Rank 0's listening socket: a daemon thread per connection; ``app`` for the handlers."""
    request_queue_size = 128   # listen backlog: a burst of connections is not reset
    daemon_threads = True
    app: App


class Handler(BaseHTTPRequestHandler):
    """One connection, on its own thread of rank 0; reaches the engine only by App.submit."""
    protocol_version = "HTTP/1.1"
    server_version = "mpitpi"
    timeout = 60        # seconds one read or write of the socket may block
    origin = None       # the request's Origin, once allowed (answers then carry CORS headers)

    def log_message(self, fmt, *args):   # one line per request on stderr, non-printables escaped
        line = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in fmt % args)
        sys.stderr.write(f"[serve] {self.address_string()} {line}\n")

    def _handle(self) -> None:
        """Every method: route it; answer every failure (a bug too) with a JSON error."""
        self.origin, self.answered, self.app = None, False, self.server.app  # answered: head sent
        want = ROUTES.get(path := self.path.split("?")[0])
        try:
            self.origin = self._allowed_origin()
            if self.command == "OPTIONS" and want:   # with an Origin: a CORS preflight
                cors = {"Access-Control-Allow-Methods": ALLOW[want], "Access-Control-Max-Age":
                        600, "Access-Control-Allow-Headers": "Authorization, Content-Type"}
                return self._head(204, {"Allow": ALLOW[want], **(cors if self.origin else {})})
            if self.command == want or (self.command == "HEAD" and want == "GET"):
                return self._post(path) if want == "POST" else self._get(path)
            if not want and self.command in ("GET", "POST"):
                raise BadRequest(404, f"no such path: {path}", kind="not_found_error")
            raise BadRequest(405, f"{self.command} is not allowed on {path}.")
        except BadRequest as e:
            self._error(e, {"Allow": ALLOW[want]} if e.status == 405 and want else {})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:   # a bug: answer it rather than drop the connection
            traceback.print_exc()
            self.close_connection = True
            if not self.answered:
                self._error(BadRequest(500, f"internal error: {e!r}"))

    do_GET = do_HEAD = do_POST = do_OPTIONS = do_PUT = do_DELETE = do_PATCH = _handle

    def _allowed_origin(self) -> str | None:
        """The Origin if its pages may call here (None without one: curl, SDKs), else 403."""
        origin = self.headers.get("Origin")
        own = {f"{s}://{self.headers.get('Host', '')}".lower() for s in ("http", "https")}
        allowed = self.app.opts.cors_origins
        if origin is None or origin.lower() in own or origin in allowed or "*" in allowed:
            return origin
        raise BadRequest(403, f"web pages at {origin!r} may not call this server. Fix: start it "
                         f"with --cors-origin {origin}.", kind="permission_error")

    def _auth(self) -> None:
        key = self.app.opts.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            raise BadRequest(401, "missing or wrong API key: send 'Authorization: Bearer "
                             "KEY'.", kind="authentication_error", code="invalid_api_key")

    def _head(self, status: int, headers: dict) -> None:   # + CORS for an allowed Origin
        self.answered = True
        self.send_response(status)
        if self.origin:
            headers.update({"Access-Control-Allow-Origin": self.origin, "Vary": "Origin"})
        if self.close_connection:
            headers["Connection"] = "close"
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.end_headers()

    def _send(self, status: int, data: dict | bytes, extra: dict | None = None,
              ctype: str = "application/json") -> None:   # a dict is sent as JSON
        data = json.dumps(data).encode() if isinstance(data, dict) else data
        self._head(status, {"Content-Type": ctype, "Content-Length": len(data), **(extra or {})})
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, e: BadRequest, extra: dict | None = None) -> None:
        if self.command == "POST":   # its body may be unread: the connection cannot go on
            self.close_connection = True
        self._send(e.status, e.body, extra)

    def send_error(self, code, message=None, explain=None):   # http.server's own, as JSON
        self.close_connection, self.origin = True, None
        self._send(code, BadRequest(code, message or explain or "bad request").body)

    def _get(self, path: str) -> None:
        if path == "/health":
            return self._send(*self.app.health())
        if path in ("/", "/index.html"):
            with open(os.path.join(STATIC, "chat.html"), "rb") as f:
                return self._send(200, f.read(), ctype="text/html; charset=utf-8")
        self._auth()
        self._send(200, {"object": "list", "data": [{
            "id": self.app.opts.name, "object": "model", "created": self.app.created,
            "owned_by": "mpitpi"}]})

    def _body(self) -> dict:
        """The request's JSON object; its length is checked before anything is read."""
        lengths = set(self.headers.get_all("Content-Length") or [])
        if self.headers.get("Transfer-Encoding") or not lengths:
            raise BadRequest(411, "a POST needs a Content-Length (and no Transfer-Encoding).")
        n = lengths.pop().strip()
        if lengths or not (n.isascii() and n.isdigit()):
            raise BadRequest(400, "the Content-Length header must be one non-negative integer.")
        if len(n) > 10 or int(n) > MAX_BODY:
            raise BadRequest(413, f"the request body is over {MAX_BODY} bytes.")
        try:
            body = json.loads(self.rfile.read(int(n)))
        except (ValueError, RecursionError) as e:   # RecursionError: nested too deeply
            raise BadRequest(400, f"the request body is not valid JSON: {e}.")
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object.")
        return body

    def _post(self, path: str) -> None:
        self._auth()
        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise BadRequest(415, f"send 'Content-Type: application/json', not {ctype!r}.")
        body = self._body()
        if (model := body.get("model")) is not None and model != self.app.opts.name:
            raise BadRequest(404, f"model {model!r} is not served here; this server serves "
                             f"{self.app.opts.name!r}.", "model", code="model_not_found")
        job = parse_request(body, chat=path == "/v1/chat/completions")
        try:
            tok = self.app.tok
            job.ids = tok.encode_chat(job.prompt) if job.chat else tok.encode(job.prompt)
        except MpitpiError as e:
            raise BadRequest(400, str(e), "messages" if job.chat else "prompt")
        job.gone = lambda: closed(self.connection)   # also once this thread has closed it
        self.app.submit(job)
        try:
            self._relay(job)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True   # the socket is closed: the engine stops the job
            self.log_message("the client left: its request is cancelled")

    def _relay(self, job: Job) -> None:
        """The one loop of both answers: events to stream chunks, or to one JSON body."""
        reply = Reply(self.app.opts.name, job.chat, job.include_usage)
        if job.stream:
            self._open_stream()
            if job.chat:
                self._write(reply.chunk({"delta": {"role": "assistant", "content": ""}}))
        while isinstance(ev := job.events.get(), Text):
            if job.stream:
                self._write(reply.delta(ev.text))
        if not job.stream and isinstance(ev, Done):
            return self._send(200, reply.whole(ev.result))
        if not job.stream:
            return self._error(BadRequest(ev.status, ev.message))
        for obj in reply.end(ev.result) if isinstance(ev, Done) else [
                BadRequest(ev.status, ev.message).body]:
            self._write(obj)
        self._write(b"data: [DONE]\n\n")
        if self.chunked:
            self._write(b"")

    def _open_stream(self) -> None:   # events: chunked for HTTP/1.1; for 1.0, ended by closing
        self.chunked = self.request_version != "HTTP/1.0"   # how _write writes
        self.close_connection = self.close_connection or not self.chunked
        self._head(200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                         **({"Transfer-Encoding": "chunked"} if self.chunked else {})})

    def _write(self, data: bytes | dict) -> None:   # a piece of the stream; a dict: an event
        if isinstance(data, dict):
            data = b"data: " + json.dumps(data).encode() + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        self.wfile.flush()


def serve(comm, loaded, tokenizer, opts: ServeOptions) -> None:
    """Collective: rank 0 serves HTTP until SIGINT/SIGTERM; the others follow."""
    bound: list[HTTPServer] = []   # rank 0's

    def bind():
        try:
            bound.append(HTTPServer((opts.host, opts.port), Handler))
        except OSError as e:
            raise MpitpiError(f"cannot listen on {opts.host}:{opts.port}: {e.strerror}. Fix: "
                              f"choose another --port, or stop what uses this one.")
    comm.root_checked(bind)
    if comm.rank != 0:
        return follow(comm, loaded)
    httpd = bound[0]
    app = httpd.app = App(comm, loaded, tokenizer, opts)
    for sig in (signal.SIGINT, signal.SIGTERM):   # stop at the next token; comm: a stuck wait
        signal.signal(sig, lambda *_: (app.stopping.set(), setattr(comm, "stop_requested", 1)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()
    print(f"mpitpi: serving {opts.name} on {comm.size} ranks at "
          f"http://{opts.host}:{httpd.server_address[1]}/ (OpenAI API under /v1)", flush=True)
    try:
        app.run()
    finally:
        httpd.shutdown()
        httpd.server_close()
    print("mpitpi: server stopped", file=sys.stderr, flush=True)
