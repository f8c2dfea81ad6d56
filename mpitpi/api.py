"""The OpenAI API's shapes: a request body checked into a Job (or a BadRequest with an
OpenAI-style error body), and the reply objects of a finished or streaming completion."""
from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from mpitpi.sampling import BadOption, SamplingParams
from mpitpi.session import Result


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
        timings = {"ttft_ms": round(res.ttft_ms, 1), "ms_per_token": round(res.ms_per_token, 2),
                   "forward_passes": res.forward_passes}
        if res.drafted:
            timings.update(draft_tokens=res.drafted, draft_accepted=res.accepted)
        return ({"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n,
                 "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}, timings)
