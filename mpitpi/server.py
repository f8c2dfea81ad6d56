"""An OpenAI-compatible HTTP server on rank 0; the other ranks follow each request.

- Rank 0, a thread per connection (``Handler``; no MPI): parses and tokenizes a request,
  queues it as a ``Job``, relays its events (``Text``* then ``Done`` or ``Failed``).
- Rank 0, main thread (``App.run``, the engine): admits jobs in arrival order into the
  running batch (batch.Batch: up to ``max_batch`` sequences, each in its own KV slot, reusing
  a cached prefix) at pass boundaries, and runs passes with the followers while any job is
  active (``comm.send_command`` starts a run, ``Batch.close`` ends it). A job that cannot
  start fails alone, before any collective; an exception inside a pass (a rank died) ends
  every job. After every token and prompt chunk a job stops if its client has gone (its slot
  is free for the next pass) or SIGINT/SIGTERM came (then queued clients get a 503, followers
  are told to quit, all exit 0). A job waits while the KV budget is full; one that could
  never fit, or one past ``max_queue`` waiting, is refused at once (503, 429).
- Other ranks (``follow``): sleep in ``comm.wait_command``, run each run's passes, quit when
  told.
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
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from mpitpi import tokens
from mpitpi.api import BadRequest, Done, Failed, Job, Text, bind, parse_request
from mpitpi.batch import Batch, Runner
from mpitpi.errors import MpitpiError
from mpitpi.grammar import Grammars
from mpitpi.metrics import CONTENT_TYPE, Metrics
from mpitpi.model import KV_DTYPES, kv_bytes_per_position as kv_bytes
from mpitpi.profile import available_memory_mb
from mpitpi.reply import Reply
from mpitpi.sampling import Sampler
from mpitpi.session import Session, check_prompt

MAX_BODY = 8 * 2**20   # bytes of a request body
STATIC = os.path.join(os.path.dirname(__file__), "static")
ROUTES = {"/health": "GET", "/": "GET", "/index.html": "GET", "/v1/models": "GET",
          "/v1/models/{id}": "GET", "/metrics": "GET", "/tokenize": "POST",
          "/detokenize": "POST", "/v1/chat/completions": "POST", "/v1/completions": "POST"}
MODEL_PATH = "/v1/models/"   # + a model id: the route /v1/models/{id}
ALLOW = {"GET": "GET, HEAD, OPTIONS", "POST": "POST, OPTIONS"}
# the chat page's own files, by name: nothing else under /static/ is served
STATIC_FILES = {"chat.css": "text/css; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
                "marked.min.js": "text/javascript; charset=utf-8",
                "purify.min.js": "text/javascript; charset=utf-8"}
ROUTES.update({f"/static/{name}": "GET" for name in STATIC_FILES})
PAGE_CSP = ("default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")


@dataclass
class ServeOptions:
    name: str                       # the model's id in the API
    host: str = "127.0.0.1"
    port: int = 8000                # 0: any free port
    api_key: str | None = None
    default_max_tokens: int = 512   # completion length when a request gives none
    cors_origins: list[str] = field(default_factory=list)   # web origins allowed; '*': any
    stall_after: float = 5.0        # /health says "stalled" after this long without progress
    max_batch: int = 8              # sequences decoded together (KV slots)
    kv_positions: int | None = None   # KV cache positions for all sequences (None: no limit)
    max_queue: int = 64             # requests waiting for a slot before 429s
    draft: int = 0                  # tokens guessed per pass (0: off)
    drafter: object = None          # rank 0's draft.ModelDrafter; None: prompt lookup


class App:
    """Rank 0's state, shared by the handler threads and the engine (the main thread)."""

    def __init__(self, comm, loaded, tokenizer, opts: ServeOptions):
        self.comm, self.loaded, self.tok, self.opts = comm, loaded, tokenizer, opts
        self.jobs: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.created = int(time.time())
        self.batch = Batch(comm, loaded.model, opts.max_batch, opts.kv_positions, opts.draft,
                           drafter=opts.drafter)
        self.grammars = Grammars(tokenizer, loaded.args.vocab_size, loaded.args.eos_token_ids)
        self.waiting: list[tuple[Job, Session]] = []   # engine only: made, not yet admitted
        self.running: dict[int, Job] = {}              # id(session) -> its job
        self.busy = False          # the engine is inside a run of passes
        self.last_progress = 0.0   # monotonic time of its last token or prefill chunk
        self.longest_gap = 0.0     # the longest wait for progress seen so far
        self.metrics = Metrics(lambda: self.jobs.qsize() + len(self.waiting),
                               lambda: len(self.running), lambda: comm.allreduce_s, comm.size)

    def model_object(self) -> dict:   # the served model, as /v1/models lists it
        return {"id": self.opts.name, "object": "model", "created": self.created,
                "owned_by": "mpitpi"}

    def submit(self, job: Job) -> None:
        """Handler thread: queue the tokenized ``job``; 400 if it exceeds the context, 503
        if it could never fit the KV budget, 429 when too many wait already."""
        ctx, n = self.loaded.args.max_seq_len, len(job.ids)
        if job.max_tokens is None:
            job.max_tokens = max(1, min(self.opts.default_max_tokens, ctx - n))
        if n + job.max_tokens > ctx:
            raise BadRequest(400, f"the prompt ({n} tokens) plus max_tokens ({job.max_tokens}) "
                             f"exceeds this model's context of {ctx} tokens.",
                             "max_tokens" if n < ctx else "messages" if job.chat else "prompt",
                             code="context_length_exceeded")
        if not self.batch.fits_ever(n + job.max_tokens):
            raise BadRequest(503, f"the prompt ({n} tokens) plus max_tokens ({job.max_tokens}) "
                             f"needs more KV cache than this server's whole budget of "
                             f"{self.opts.kv_positions} positions. Fix: lower max_tokens, or "
                             f"start the server with a larger --kv-budget.",
                             code="kv_budget_exceeded")
        if self.jobs.qsize() + len(self.waiting) >= self.opts.max_queue:
            raise BadRequest(429, f"{self.opts.max_queue} requests are already waiting; try "
                             f"again later (or start the server with a larger --max-queue).",
                             kind="rate_limit_error", code="queue_full")
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
            s = Session(job.ids, job.max_tokens, Sampler(job.params), args.eos_token_ids,
                        self.tok.decode, job.stops, cancel=lambda: self._tick(job),
                        logprobs=job.logprobs, grammar=job.constraint)
            if job.stream:   # a whole answer waits for Done: no wake-up per token
                s.on_text = lambda t: job.events.put(Text(t, s.new_logprobs()))
            return s
        except MpitpiError as e:
            job.events.put(Failed(str(e), 400))
        return None

    def _take_jobs(self, wait: float) -> None:
        """Engine thread: move queued jobs into ``waiting`` (blocking up to ``wait`` s for
        the first), drop waiting jobs whose client left, admit waiting jobs in order."""
        try:
            job = self.jobs.get(timeout=wait) if wait else self.jobs.get_nowait()
            while True:
                if (session := self._session(job)) is not None:
                    self.waiting.append((job, session))
                job = self.jobs.get_nowait()
        except queue.Empty:
            pass
        for job, session in list(self.waiting):
            if job.gone():
                self.waiting.remove((job, session))
                job.events.put(Failed("the client has left.", 499))
        while self.waiting and self.batch.admit(self.waiting[0][1]):
            job, session = self.waiting.pop(0)
            self.running[id(session)] = job

    def _finished(self, session: Session) -> None:
        job = self.running.pop(id(session))
        self.metrics.finished(session.result)
        if session.result.finish_reason != "cancelled":
            return job.events.put(Done(session.result))
        why = ("the server is shutting down.", 503) if self.stopping.is_set() else (
            "the client has left.", 499)   # 499: nginx's "client closed request"
        job.events.put(Failed(*why))

    def run(self) -> None:
        """Rank 0's main thread: run the batch with the followers until stopping, then end
        the jobs in flight, fail the rest and tell the followers to quit. Collective errors
        are re-raised (every job in flight is failed first)."""
        try:
            while not self.stopping.is_set() or self.batch.active:
                if not self.stopping.is_set():
                    self._take_jobs(0 if self.batch.active else 0.1)
                if self.batch.active:
                    if not self.busy:   # wake the followers for a run of passes
                        self.comm.send_command({"op": "generate"})
                        self.last_progress, self.busy = time.monotonic(), True
                    for session in self.batch.step():
                        self._finished(session)
                elif self.busy:
                    self._end_run()
            if self.busy:
                self._end_run()
        except BaseException as e:
            for job in self.running.values():
                job.events.put(Failed(f"generation failed: {e}"))
            raise
        for job, _ in self.waiting:
            job.events.put(Failed("the server is shutting down.", 503))
        while not self.jobs.empty():
            self.jobs.get().events.put(Failed("the server is shutting down.", 503))
        self.comm.send_command({"op": "quit"})

    def _end_run(self) -> None:
        """Collective: end the run of passes, then gather every rank's all-reduce seconds
        for /metrics (once per run; ``follow`` sends them)."""
        self.batch.close()
        self.busy = False
        self.metrics.set_ranks(self.comm.gather_obj(self.comm.allreduce_s))


def follow(comm, loaded) -> None:
    """Ranks other than 0: run each run of passes rank 0 starts, until told to quit; after
    each run, send rank 0 this rank's all-reduce seconds (App._end_run)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # rank 0 leads the shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    runner = Runner(comm, loaded.model)
    while comm.wait_command()["op"] != "quit":
        runner.follow()
        comm.gather_obj(comm.allreduce_s)


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
    route = None        # the request's key in ROUTES (None: no route), for /metrics

    def log_message(self, fmt, *args):   # one line per request on stderr, non-printables escaped
        line = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in fmt % args)
        sys.stderr.write(f"[serve] {self.address_string()} {line}\n")

    def _handle(self) -> None:
        """Every method: route it; answer every failure (a bug too) with a JSON error."""
        self.origin, self.answered, self.app = None, False, self.server.app  # answered: head sent
        path = self.path.split("?")[0]
        route = "/v1/models/{id}" if path.startswith(MODEL_PATH) and path != MODEL_PATH else path
        self.route = route if (want := ROUTES.get(route)) else None
        try:
            self.origin = self._allowed_origin()
            if self.command == "OPTIONS" and want:   # with an Origin: a CORS preflight
                cors = {"Access-Control-Allow-Methods": ALLOW[want], "Access-Control-Max-Age":
                        600, "Access-Control-Allow-Headers": "Authorization, Content-Type"}
                return self._head(204, {"Allow": ALLOW[want], **(cors if self.origin else {})})
            if self.command == want or (self.command == "HEAD" and want == "GET"):
                if path in ("/tokenize", "/detokenize"):
                    return self._tokens(path)
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
        self.server.app.metrics.answered(self.route or "other", status)
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
        self.close_connection, self.origin, self.route = True, None, None
        self._send(code, BadRequest(code, message or explain or "bad request").body)

    def _get(self, path: str) -> None:
        if path == "/health":
            return self._send(*self.app.health())
        if path in ("/", "/index.html"):   # the page loads nothing but this server's files
            with open(os.path.join(STATIC, "chat.html"), "rb") as f:
                return self._send(200, f.read(), {"Content-Security-Policy": PAGE_CSP},
                                  ctype="text/html; charset=utf-8")
        if path.startswith("/static/"):   # only names of STATIC_FILES are routed here
            name = path[len("/static/"):]
            with open(os.path.join(STATIC, name), "rb") as f:
                return self._send(200, f.read(), {"Cache-Control": "no-cache"},
                                  ctype=STATIC_FILES[name])
        self._auth()   # /v1 and /metrics
        if path == "/metrics":
            return self._send(200, self.app.metrics.render(), ctype=CONTENT_TYPE)
        if path.startswith(MODEL_PATH):
            self._served(unquote(path[len(MODEL_PATH):]))
            return self._send(200, self.app.model_object())
        self._send(200, {"object": "list", "data": [self.app.model_object()]})

    def _tokens(self, path: str) -> None:
        """POST /tokenize and /detokenize (llama-server's): the tokenizer alone, no ranks."""
        self._auth()
        answer = tokens.tokenize if path == "/tokenize" else tokens.detokenize
        self._send(200, answer(self.app.tok, self._body()))

    def _served(self, model) -> None:
        """404 unless ``model`` is the id this server serves."""
        if model != self.app.opts.name:
            raise BadRequest(404, f"model {model!r} is not served here; this server serves "
                             f"{self.app.opts.name!r}.", "model", code="model_not_found")

    def _body(self) -> dict:
        """The request's JSON object (Content-Type application/json); its length is checked
        before anything is read."""
        ctype = self.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise BadRequest(415, f"send 'Content-Type: application/json', not {ctype!r}.")
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
        body = self._body()
        if (model := body.get("model")) is not None:
            self._served(model)
        job = parse_request(body, chat=path == "/v1/chat/completions")
        bind(job, self.app.tok, self.app.grammars, self.app.loaded.args.vocab_size)
        job.gone = lambda: closed(self.connection)   # also once this thread has closed it
        self.app.submit(job)
        try:
            self._relay(job)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True   # the socket is closed: the engine stops the job
            self.log_message("the client left: its request is cancelled")

    def _relay(self, job: Job) -> None:
        """The one loop of both answers: events to stream chunks, or to one JSON body."""
        tok = self.app.tok
        reply = Reply(self.app.opts.name, job.chat, job.include_usage,
                      lambda t: (tok.decode([t]), tok.token_bytes(t)), job.tool_names,
                      job.parallel_tool_calls)
        if job.stream:
            self._open_stream()
            if job.chat:
                self._write(reply.chunk({"delta": {"role": "assistant", "content": ""}}))
        while isinstance(ev := job.events.get(), Text):
            if job.stream and not reply.holds_text:
                self._write(reply.delta(ev.text, ev.logprobs))
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


def kv_bytes_per_position(loaded) -> int:
    """KV cache bytes one position takes on the rank holding the most KV heads (k and v of
    every layer, in the cache's dtype)."""
    kv = {t: n for n, t in KV_DTYPES.items()}[loaded.model.kv_dtype]
    return kv_bytes(loaded.args, max(s.n_kv for s in loaded.plan), kv)


def kv_plan(comm, loaded, budget_bytes: int | None, max_batch: int | None) -> tuple[int, int]:
    """Collective: (KV positions for all sequences, max batch) from ``--kv-budget`` (None:
    a quarter of the least available memory over the ranks) and ``--max-batch`` (None: as
    many sequences of min(context, 2048) positions as the budget holds, 1..16)."""
    least = min(comm.allgather_obj(available_memory_mb()))
    budget = budget_bytes if budget_bytes is not None else int(least * 2**20 / 4)
    positions = budget // kv_bytes_per_position(loaded)
    if max_batch is None:
        max_batch = max(1, min(16, positions // min(loaded.args.max_seq_len, 2048)))
    return positions, max_batch


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
          f"http://{opts.host}:{httpd.server_address[1]}/ (OpenAI API under /v1); up to "
          f"{opts.max_batch} requests at once, KV budget {opts.kv_positions} positions",
          flush=True)
    try:
        app.run()
    finally:
        httpd.shutdown()
        httpd.server_close()
    print("mpitpi: server stopped", file=sys.stderr, flush=True)
