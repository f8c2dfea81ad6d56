"""The OpenAI API's requests: a body checked into a Job (or a BadRequest with an
OpenAI-style error body); the events a Job's generation sends (reply.py makes the answers).

``FIELDS`` is the contract: every request field of OpenAI's chat completions and
completions schemas (plus llama.cpp's sampling extras), each honoured, accepted without
effect, or refused with a 400 naming it; a field in neither is refused too. docs/API.md is
the user's copy of this table."""
from __future__ import annotations

import json
import queue
from collections.abc import Callable
from dataclasses import dataclass, field

from mpitpi.errors import MpitpiError
from mpitpi.grammar import BadGrammar, forced_call
from mpitpi.sampling import BadOption, SamplingParams, bias_from_json, bias_outside
from mpitpi.session import Result
from mpitpi.tools import template_messages, template_takes_tools

HONOURED, NO_EFFECT, REFUSED = "honoured", "no effect", "refused"
CHAT, TEXT, BOTH = ("chat",), ("text",), ("chat", "text")
# field -> (endpoints, what happens, what to know); a REFUSED field is accepted only when
# absent, null or one of its REFUSED_OK values
FIELDS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "model": (BOTH, HONOURED, "must be this server's model id (404 otherwise) or absent"),
    "messages": (CHAT, HONOURED, "roles system, developer (as system), user, assistant (with "
                 "tool_calls) and tool; text content or text parts"),
    "prompt": (TEXT, HONOURED, "one string (or a list of one string)"),
    "max_tokens": (BOTH, HONOURED, "default: 512 or what the context leaves"),
    "max_completion_tokens": (BOTH, HONOURED, "same as max_tokens"),
    "stop": (BOTH, HONOURED, "up to 4 strings"),
    "stream": (BOTH, HONOURED, "server-sent events"),
    "stream_options": (BOTH, HONOURED, "include_usage honoured; include_obfuscation has no "
                       "effect"),
    "temperature": (BOTH, HONOURED, "[0, 100]; 0 is greedy; default 1"),
    "top_p": (BOTH, HONOURED, "(0, 1]"),
    "seed": (BOTH, HONOURED, "same seed, same answer (also with other requests batched)"),
    "presence_penalty": (BOTH, HONOURED, "[-2, 2], over the generated tokens"),
    "frequency_penalty": (BOTH, HONOURED, "[-2, 2], over the generated tokens"),
    "logit_bias": (BOTH, HONOURED, "token id (a string) -> [-100, 100] added to its logit; "
                   "-100 bans the token"),
    "logprobs": (BOTH, HONOURED, "chat: true/false; completions: 0-20 alternatives"),
    "top_logprobs": (CHAT, HONOURED, "0-20, needs logprobs: true"),
    "response_format": (BOTH, HONOURED, "text, json_object, json_schema (constrained "
                        "decoding); on /v1/completions an extension"),
    "tools": (CHAT, HONOURED, "function tools, shown through the model's chat template; 400 "
              "if the template has no tool support"),
    "tool_choice": (CHAT, HONOURED, "none, auto; required or a named function by constrained "
                    "decoding"),
    "parallel_tool_calls": (CHAT, HONOURED, "false keeps the first call only"),
    "n": (BOTH, REFUSED, "one choice per request: send n requests instead"),
    "best_of": (TEXT, REFUSED, "only 1: send several requests and compare them yourself"),
    "echo": (TEXT, REFUSED, "only false: prepend the prompt yourself"),
    "suffix": (TEXT, REFUSED, "insertion is not supported: send the prefix as the prompt"),
    "audio": (CHAT, REFUSED, "text only: leave it out"),
    "modalities": (CHAT, REFUSED, "only [\"text\"]"),
    "functions": (CHAT, REFUSED, "deprecated by OpenAI: send tools instead"),
    "function_call": (CHAT, REFUSED, "deprecated by OpenAI: send tool_choice instead"),
    "reasoning_effort": (CHAT, REFUSED, "this model does not reason in hidden tokens: leave "
                         "it out"),
    "verbosity": (CHAT, REFUSED, "not supported: ask for the length in the prompt"),
    "web_search_options": (CHAT, REFUSED, "no web search here: leave it out"),
    "prediction": (CHAT, NO_EFFECT, "predicted output only speeds up; ignored (see --draft)"),
    "user": (BOTH, NO_EFFECT, "accepted, not stored"),
    "safety_identifier": (CHAT, NO_EFFECT, "accepted, not stored"),
    "metadata": (CHAT, NO_EFFECT, "accepted, not stored"),
    "store": (CHAT, NO_EFFECT, "nothing is stored"),
    "service_tier": (CHAT, NO_EFFECT, "one tier"),
    "prompt_cache_key": (CHAT, NO_EFFECT, "prefix caching is automatic"),
    "prompt_cache_retention": (CHAT, NO_EFFECT, "prefix caching is automatic"),
    # llama.cpp's sampling extras
    "top_k": (BOTH, HONOURED, "llama.cpp's: >= 0, 0 is off"),
    "min_p": (BOTH, HONOURED, "llama.cpp's: [0, 1)"),
    "repeat_penalty": (BOTH, HONOURED, "llama.cpp's: (0, 100], over prompt and output"),
    "repetition_penalty": (BOTH, HONOURED, "same as repeat_penalty"),
}
REFUSED_OK = {"n": [1], "best_of": [1], "echo": [False], "suffix": [""],
              "modalities": [["text"]], "function_call": ["none"]}
MAX_LOGPROBS = 20


def check_fields(body: dict, chat: bool) -> None:
    """400 naming the first field that is unknown, of the other endpoint, or refused."""
    here = "chat" if chat else "text"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    for name, value in body.items():
        spec = FIELDS.get(name)
        if spec is None or here not in spec[0]:
            other = " (a field of the other endpoint)" if spec else ""
            raise BadRequest(400, f"unknown field {name!r} for {path}{other}. Fix: leave it out "
                             f"(docs/API.md lists every field this server reads).", name,
                             code="unknown_parameter")
        if spec[1] == REFUSED and value is not None and not any(   # 1 == True: types too
                value == ok and type(value) is type(ok) for ok in REFUSED_OK.get(name, [])):
            raise BadRequest(400, f"{name!r}: {json.dumps(value)} is not supported here: "
                             f"{spec[2]}.", name, code="unsupported_parameter")


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
    logprobs: list = field(default_factory=list)   # Result.logprobs entries since the last


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
    logprobs: int | None = None          # None: off; else alternatives per token
    schema: dict | None = None           # response_format's JSON schema (constrained)
    tools: list[dict] | None = None      # function tools, as sent
    tool_choice: str | dict = "auto"     # "none", "auto", "required" or a named function
    parallel_tool_calls: bool = True
    constraint: object = None            # grammar.Constraint, made by ``bind``
    ids: list[int] = field(default_factory=list)               # the tokenized prompt
    events: queue.Queue = field(default_factory=queue.Queue)   # Text* then Done or Failed
    gone: Callable[[], bool] = lambda: False                   # the client has left

    @property
    def tool_names(self) -> set[str] | None:
        """Names of the tools whose calls are read back from the answer (None: no tools)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return {t["function"]["name"] for t in self.tools}


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


def _logit_bias(body: dict) -> dict[int, float] | None:
    """{"token id": bias} -> {id: bias}; the range is checked by SamplingParams."""
    try:
        return bias_from_json(body.get("logit_bias"))
    except BadOption as e:
        raise BadRequest(400, f"'logit_bias': {e}", "logit_bias")


def parse_sampling(body: dict) -> SamplingParams:
    """The request's SamplingParams, checked; temperature 1 when absent (OpenAI's default)."""
    penalty = "repeat_penalty" if body.get("repetition_penalty") is None else "repetition_penalty"
    try:
        return SamplingParams(
            temperature=_number(body, "temperature", default=1.0),
            top_k=_number(body, "top_k", True, 0), top_p=_number(body, "top_p", default=1.0),
            min_p=_number(body, "min_p", default=0.0),
            repeat_penalty=_number(body, penalty, default=1.0),
            presence_penalty=_number(body, "presence_penalty", default=0.0),
            frequency_penalty=_number(body, "frequency_penalty", default=0.0),
            seed=_number(body, "seed", True), logit_bias=_logit_bias(body)).check()
    except BadOption as e:
        param = {"repeat_penalty": "repetition_penalty"}.get(e.field, e.field)
        raise BadRequest(400, f"invalid '{param}': {e}", param)


def parse_logprobs(body: dict, chat: bool) -> int | None:
    """Alternatives per token to report (None: no log-probs). Chat: ``logprobs`` true with
    ``top_logprobs`` 0-20; completions: ``logprobs`` 0-20."""
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        if lp is not None and not isinstance(lp, bool):
            raise BadRequest(400, "'logprobs' must be true or false.", "logprobs")
        if top is not None and not lp:
            raise BadRequest(400, "'top_logprobs' needs 'logprobs': true.", "top_logprobs")
        key, n = "top_logprobs", (_number(body, "top_logprobs", True, 0) if lp else None)
    else:
        key, n = "logprobs", _number(body, "logprobs", True)
    if n is not None and not 0 <= n <= MAX_LOGPROBS:
        raise BadRequest(400, f"'{key}' must be in [0, {MAX_LOGPROBS}], got {n}.", key)
    return n


def parse_response_format(body: dict) -> dict | None:
    """The JSON schema the answer must follow (json_object: any object); None for text."""
    rf = body.get("response_format")
    kind = rf.get("type") if isinstance(rf, dict) else None
    if rf is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if isinstance(js, dict) and isinstance(js.get("schema", {}), dict):
            return js.get("schema") or {"type": "object"}
    raise BadRequest(400, "'response_format' must be {\"type\": \"text\"}, {\"type\": "
                     "\"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": "
                     "{\"name\": ..., \"schema\": {...}}}.", "response_format")


def parse_tools(body: dict) -> tuple[list[dict] | None, str | dict, bool]:
    """(tools, tool_choice, parallel_tool_calls), their shapes checked."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(
                f := t.get("function"), dict) and isinstance(f.get("name"), str) and f["name"]
            and isinstance(f.get("parameters", {}), dict) for t in tools)):
        raise BadRequest(400, "'tools' must be a list of {\"type\": \"function\", \"function\": "
                         "{\"name\": ..., \"description\": ..., \"parameters\": {JSON "
                         "schema}}}.", "tools")
    names = {t["function"]["name"] for t in tools or []}
    if choice is None:
        choice = "auto"
    named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
        choice.get("function"), dict) and isinstance(choice["function"].get("name"), str) and \
        choice["function"]["name"] in names
    if not (choice in ("none", "auto", "required") or named):
        raise BadRequest(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                         "{\"type\": \"function\", \"function\": {\"name\": NAME}} naming one of "
                         "'tools'.", "tool_choice")
    if choice != "none" and choice != "auto" and not tools:
        raise BadRequest(400, "'tool_choice' asks for a tool call but 'tools' is empty.",
                         "tool_choice")
    if not isinstance(parallel := body.get("parallel_tool_calls", True), bool):
        raise BadRequest(400, "'parallel_tool_calls' must be true or false.",
                         "parallel_tool_calls")
    return tools or None, choice, parallel


def parse_request(body: dict, chat: bool) -> Job:
    """Every option of a /v1/chat/completions (``chat``) or /v1/completions body, checked."""
    check_fields(body, chat)
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not (isinstance(stops, list) and len(stops) <= 4 and all(isinstance(s, str) for s in stops)):
        raise BadRequest(400, "'stop' must be a string or a list of at most 4 strings.", "stop")
    if not isinstance(stream := body.get("stream", False), bool):
        raise BadRequest(400, "'stream' must be true or false.", "stream")
    if not isinstance(so := body.get("stream_options") or {}, dict):
        raise BadRequest(400, "'stream_options' must be an object.", "stream_options")
    key = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
    if (max_tokens := _number(body, key, integer=True)) is not None and max_tokens < 1:
        raise BadRequest(400, f"'{key}' must be >= 1, got {max_tokens}.", "max_tokens")
    prompt = p[0] if isinstance(p := body.get("prompt"), list) and len(p) == 1 else p
    if not chat and not (isinstance(prompt, str) and prompt):
        raise BadRequest(400, "'prompt' must be a non-empty string.", "prompt")
    tools, choice, parallel = parse_tools(body)
    return Job(chat, parse_messages(body) if chat else prompt, max_tokens,
               parse_sampling(body), stops, stream, bool(so.get("include_usage", False)),
               logprobs=parse_logprobs(body, chat), schema=parse_response_format(body),
               tools=tools, tool_choice=choice, parallel_tool_calls=parallel)


def _content(m: dict):
    """A message's content as a string (text parts joined); None where absent; else 0."""
    content = m.get("content")
    if isinstance(content, list) and all(   # [{"type": "text", "text": ...}, ...]
            isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
            for c in content):
        content = "".join(c["text"] for c in content)
    return content if content is None or isinstance(content, str) else 0


def _tool_calls_ok(calls) -> bool:
    return isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(f := c.get("function"), dict) and isinstance(
            f.get("name"), str) and isinstance(f.get("arguments", ""), (str, dict))
        for c in calls)


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest(400, "'messages' must be a non-empty list.", "messages")
    out = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        content = _content(m) if isinstance(m, dict) else 0
        calls = m.get("tool_calls") if role == "assistant" else None
        if role == "assistant" and calls is not None:
            if not _tool_calls_ok(calls):
                raise BadRequest(400, f"messages[{i}].tool_calls must be a list of {{\"id\", "
                                 "\"type\": \"function\", \"function\": {\"name\", "
                                 "\"arguments\"}}}.", "messages")
            out.append({"role": role, "content": content or "", "tool_calls": calls})
            continue
        if role == "tool" and isinstance(content, str):
            out.append({"role": "tool", "content": content,
                        "tool_call_id": str(m.get("tool_call_id") or ""),
                        **({"name": m["name"]} if isinstance(m.get("name"), str) else {})})
            continue
        if not isinstance(content, str) or role not in (
                "system", "developer", "user", "assistant"):
            raise BadRequest(400, f"messages[{i}] needs a 'role' (system, developer, user, "
                             "assistant or tool) and a 'content' string or list of text parts.",
                             "messages")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def bind(job: Job, tok, grammars, vocab_size: int) -> None:
    """Checks and work that need the model: logit_bias ids in its vocabulary, tools only
    where its chat template shows them, the prompt's token ids (``job.ids``), the grammar
    of response_format or a forced tool call (``job.constraint``)."""
    if bad := bias_outside(job.params.logit_bias, vocab_size):
        raise BadRequest(400, f"'logit_bias' names token ids {bad} outside this model's "
                         f"vocabulary [0, {vocab_size}).", "logit_bias")
    uses_tools = job.chat and (job.tools or any(
        m["role"] == "tool" or "tool_calls" in m for m in job.prompt))
    if uses_tools and not template_takes_tools(tok.chat_template):
        raise BadRequest(400, "this model's chat template has no tool support (it never reads "
                         "'tools'), so tools and tool messages cannot be shown to it. Fix: "
                         "leave 'tools' out, or serve a model whose template supports them.",
                         "tools" if job.tools else "messages")
    try:
        if job.chat:
            shown = job.tools if job.tool_choice != "none" else None
            job.ids = tok.encode_chat(template_messages(job.prompt), shown)
        else:
            job.ids = tok.encode(job.prompt)
    except MpitpiError as e:
        raise BadRequest(400, str(e), "messages" if job.chat else "prompt")
    try:
        if job.tool_names is not None and job.tool_choice != "auto":
            job.constraint = forced_call(grammars, tok.chat_template, job.tools,
                                         job.tool_choice)
        elif job.schema is not None:
            job.constraint = grammars.json_schema(job.schema)
    except BadGrammar as e:
        param = "response_format" if job.schema is not None else "tools"
        raise BadRequest(400, f"cannot constrain the answer to this schema: {e}", param)
