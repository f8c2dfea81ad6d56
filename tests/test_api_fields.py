"""Every OpenAI request field: refusals name the field; log-probs against transformers'
log_softmax (2 ranks); OpenAI's presence/frequency penalties and logit_bias; JSON schema
and json_object answers by constrained decoding (SmolLM2, 2 ranks); tools through a chat
template that shows them, and tool calls read back."""
import json
import os
import shutil
import subprocess
import sys

import jsonschema
import pytest
import torch

import refmodels
from test_server import Server
from mpitpi.api import FIELDS, NO_EFFECT, REFUSED, BadRequest, bind, parse_request
from mpitpi.sampling import Sampler, SamplingParams
from mpitpi.tokenizer import load_tokenizer
from mpitpi.tools import parse_tool_calls, template_takes_tools

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "API.md")
HI = [{"role": "user", "content": "hi"}]
# a chat template of our own that shows tools and teaches <tool_call> tags
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>You may call these functions:\n{% for t in tools %}"
    "{{ t.function | tojson }}\n{% endfor %}Answer a call as <tool_call>{\"name\": NAME, "
    "\"arguments\": {...}}</tool_call>\n{% endif %}{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}{% else %}"
    "{{ m.content }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>"
    "{% endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"], "additionalProperties": False}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}


def body(chat=True, **kw):
    return {"messages": HI, **kw} if chat else {"prompt": "hi", **kw}


# (endpoint is chat, the field and a value that must be refused)
REFUSE = [(True, "n", 2), (False, "best_of", 3), (False, "echo", True), (False, "suffix", "x"),
          (True, "audio", {"voice": "alloy"}), (True, "modalities", ["text", "audio"]),
          (True, "functions", [{"name": "f"}]), (True, "function_call", "auto"),
          (True, "reasoning_effort", "low"), (True, "verbosity", "low"),
          (True, "web_search_options", {}), (True, "wizardry", 1), (False, "messages", HI),
          (False, "tools", [WEATHER]), (True, "top_logprobs", 2), (True, "logprobs", 3),
          (False, "logprobs", 21), (True, "logit_bias", {"x": 1}),
          (True, "logit_bias", {"5": 101}), (True, "presence_penalty", 2.5),
          (True, "frequency_penalty", -3), (True, "response_format", {"type": "yaml"}),
          (True, "tool_choice", "required"), (True, "tool_choice", {"type": "function",
                                                                    "function": {"name": "g"}}),
          (True, "tools", [{"type": "function"}]), (True, "parallel_tool_calls", "yes"),
          (True, "n", True), (False, "echo", 0),
          (True, "tool_choice", {"type": "function", "function": {"name": ["get_weather"]}})]


@pytest.mark.parametrize("chat,name,value", REFUSE, ids=[f"{r[1]}={r[2]}" for r in REFUSE])
def test_refused_fields_get_a_400_naming_them(chat, name, value):
    with pytest.raises(BadRequest) as e:
        parse_request(body(chat, **{name: value}, **(
            {"tools": [WEATHER]} if name == "tool_choice" and isinstance(value, dict) and
            isinstance(value["function"]["name"], list) else {})), chat)
    assert e.value.status == 400 and e.value.body["error"]["param"] == name, e.value.body
    assert name in e.value.body["error"]["message"] or "'" in e.value.body["error"]["message"]


def test_no_effect_fields_defaults_and_nulls_are_accepted():
    for chat in (True, False):
        here = "chat" if chat else "text"
        quiet = {k: "x" for k, (ends, what, _) in FIELDS.items()
                 if what == NO_EFFECT and here in ends}
        nulls = {k: None for k, (ends, what, _) in FIELDS.items()
                 if what == REFUSED and here in ends}
        job = parse_request(body(chat, **quiet, **{**nulls, "n": 1}), chat)
        assert job.logprobs is None and job.schema is None


def test_docs_list_every_field_with_its_fate():
    doc = open(DOCS).read()
    for name, (_, what, _) in FIELDS.items():
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{name}` |")), "")
        assert what in row, f"docs/API.md has no row for {name} saying {what!r}"


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.tensor([2.0, 1.9, 0.0])

    def pick(gen, **kw):   # the prompt is [0, 0]; ``gen`` the tokens generated so far
        return Sampler(SamplingParams(**kw))(logits, [0, 0] + gen, None, gen)
    assert pick([]) == 0 and pick([], presence_penalty=0.2) == 0   # the prompt does not count
    assert pick([0], presence_penalty=0.2) == 1 and pick([0], presence_penalty=0.05) == 0
    assert pick([0, 0], frequency_penalty=0.06) == 1 and pick([0, 0], frequency_penalty=0.04) == 0
    assert pick([1, 1, 1], presence_penalty=-1.0) == 1     # negative: repeat, as defined
    adj = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)).adjust(
        logits, [], [1, 1, 2])
    assert torch.allclose(adj, torch.tensor([2.0, 1.9 - 0.5 - 0.5, 0.0 - 0.5 - 0.25]))


def test_logit_bias_bans_and_forces_tokens():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1)) * 3
    top = int(logits.argmax())
    for t in (0.0, 1.0, 2.0):
        banned = Sampler(SamplingParams(temperature=t, seed=3, logit_bias={top: -100}))
        assert all(banned(logits, []) != top for _ in range(50))
        forced = Sampler(SamplingParams(temperature=t, seed=3, logit_bias={7: 100}))
        assert all(forced(logits, []) == 7 for _ in range(20))
    assert not Sampler(SamplingParams(logit_bias={7: 1})).greedy


def test_tool_calls_are_read_back_in_both_forms():
    names = {"get_weather"}
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' \
           '\n</tool_call>'
    content, calls = parse_tool_calls(text, names)
    assert content == "Let me look." and len(calls) == 1
    c = calls[0]
    assert c["type"] == "function" and c["id"].startswith("call_")
    assert c["function"]["name"] == "get_weather"
    assert json.loads(c["function"]["arguments"]) == {"city": "Oslo"}
    content, calls = parse_tool_calls('<|python_tag|>{"name": "get_weather", "parameters": '
                                      '{"city": "Rome"}}', names)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    for plain in ('{"name": "other", "arguments": {}}', "no call here", "<tool_call>{bad",
                  '{"name": ["get_weather"], "arguments": {}}'):   # a list: no crash
        assert parse_tool_calls(plain, names) == (plain, [])


@pytest.fixture(scope="module")
def toolmodel(models, tmp_path_factory):
    """(folder, transformers model): llama-deep (4096 positions) with a tokenizer and a chat
    template that shows tools."""
    folder, hf = models("llama-deep")
    dst = tmp_path_factory.mktemp("tools")
    shutil.copytree(folder, dst, dirs_exist_ok=True)
    refmodels.save_tokenizer(str(dst))
    with open(dst / "tokenizer_config.json", "w") as f:
        json.dump({"chat_template": TOOLS_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}, f)
    return str(dst), hf


def test_tools_are_rendered_and_refused_without_template_support(toolmodel):
    tok = load_tokenizer(os.path.join(toolmodel[0], "tokenizer.json"))
    assert template_takes_tools(tok.chat_template)
    msgs = [{"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    as_object = [*msgs[:1], {**msgs[1], "tool_calls": [{**msgs[1]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": {"city": "Oslo"}}}]}, msgs[2]]
    for history in (as_object, msgs):   # arguments as an object (some clients) or a string
        job = parse_request({"messages": history, "tools": [WEATHER]}, True)
        bind(job, tok, None, 300)
        text = tok.tok.decode(job.ids, skip_special_tokens=False)
        assert '"name": "get_weather"' in text and '"description": "the weather of a city"' in text
        assert ('<|assistant|><tool_call>{"arguments": {"city": "Oslo"}, "name": "get_weather"}'
                '</tool_call>') in text.replace("\\u003c", "<").replace("\\u003e", ">")
        assert "<|tool|>sunny" in text and text.endswith("<|assistant|>")
    none = parse_request({"messages": msgs[:1], "tools": [WEATHER], "tool_choice": "none"}, True)
    bind(none, tok, None, 300)
    assert "get_weather" not in tok.tok.decode(none.ids) and none.tool_names is None
    plain = load_tokenizer(os.path.join(toolmodel[0], "tokenizer.json"))
    plain.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    for req, param in (({"messages": HI, "tools": [WEATHER]}, "tools"),
                       ({"messages": msgs}, "messages")):
        with pytest.raises(BadRequest) as e:
            bind(parse_request(req, True), plain, None, 300)
        assert e.value.status == 400 and e.value.body["error"]["param"] == param
        assert "no tool support" in e.value.body["error"]["message"]
    with pytest.raises(BadRequest) as e:
        bind(parse_request(body(logit_bias={"300": 5}), True), tok, None, 300)
    assert e.value.body["error"]["param"] == "logit_bias"


@pytest.fixture(scope="module")
def tiny(toolmodel, tmp_path_factory):
    """The server on 2 ranks of toolmodel (its shards in the tests' own cache)."""
    with pytest.MonkeyPatch.context() as mp:   # its shards in the tests' own cache
        mp.setenv("MPITPI_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        s = Server(2, ["--model", toolmodel[0]])
        yield s
        s.kill()


def post(server, path, req):
    status, r = server.request("POST", path, req)
    assert status == 200, r
    return r


def streamed(server, path, req) -> list[dict]:
    """The events of a streamed request (before [DONE])."""
    status, raw = server.request("POST", path, {**req, "stream": True})
    assert status == 200, raw
    return [json.loads(line[6:]) for line in raw.decode().splitlines()
            if line.startswith("data: {")]


def test_logprobs_are_transformers_log_softmax_also_streamed(tiny, toolmodel):
    folder, hf = toolmodel
    tok = load_tokenizer(os.path.join(folder, "tokenizer.json"))
    prompt = "the quick brown fox"
    req = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 3}
    lp = post(tiny, "/v1/completions", req)["choices"][0]["logprobs"]
    n = len(lp["tokens"])
    assert n >= 1
    ids = tok.encode(prompt)
    greedy = refmodels.reference_greedy(hf, ids, n)
    ref = torch.log_softmax(refmodels.reference_logits(hf, ids, greedy).double(), -1)
    for i, t in enumerate(greedy):
        assert lp["tokens"][i] == tok.decode([t])
        assert abs(lp["token_logprobs"][i] - float(ref[i, t])) < 1e-4
        best = ref[i].topk(3)     # a dict by text: tokens of one text (U+FFFD) share a key
        want: dict = {}
        for j, v in zip(best.indices.tolist(), best.values.tolist()):
            want.setdefault(tok.decode([j]), v)
        assert lp["top_logprobs"][i].keys() == want.keys()
        assert all(abs(lp["top_logprobs"][i][k] - v) < 1e-4 for k, v in want.items())
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(n)]
    chunks = [c["choices"][0]["logprobs"] for c in streamed(tiny, "/v1/completions", req)]
    got = sum((c["token_logprobs"] for c in chunks if c), [])   # the prefix cached: rounding
    assert torch.allclose(torch.tensor(got), torch.tensor(lp["token_logprobs"]), atol=1e-4)
    assert sum((c["text_offset"] for c in chunks if c), []) == lp["text_offset"]
    chat = post(tiny, "/v1/chat/completions", {"messages": HI, "max_tokens": 4, "temperature": 0,
                                               "logprobs": True, "top_logprobs": 2})["choices"][0]
    content = chat["logprobs"]["content"]
    raw = b"".join(bytes(c["bytes"]) for c in content)   # a random model: bytes of broken UTF-8
    assert raw.decode(errors="replace") == chat["message"]["content"]
    assert all(len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["logprob"] >= c["logprob"]
               for c in content)


def test_logit_bias_bans_and_forces_through_the_server(tiny, toolmodel):
    tok = load_tokenizer(os.path.join(toolmodel[0], "tokenizer.json"))
    req = {"prompt": "hello world", "max_tokens": 3, "temperature": 0, "logprobs": 0}
    first = tok.encode(post(tiny, "/v1/completions", req)["choices"][0]["logprobs"]["tokens"][0],
                       special=False)[0]
    banned = post(tiny, "/v1/completions", {**req, "logit_bias": {str(first): -100}})
    assert banned["choices"][0]["logprobs"]["tokens"][0] != tok.decode([first])
    forced = post(tiny, "/v1/completions", {**req, "logit_bias": {"77": 100}})
    assert forced["choices"][0]["text"] == tok.decode([77]) * 3


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_weather"}}])
def test_a_forced_tool_call_comes_back_as_tool_calls(tiny, choice):
    req = {"messages": [{"role": "user", "content": "weather in Oslo?"}], "tools": [WEATHER],
           "tool_choice": choice, "max_tokens": 200, "temperature": 0}
    r = post(tiny, "/v1/chat/completions", req)["choices"][0]
    assert r["finish_reason"] == "tool_calls", r
    (call,) = r["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["type"] == "function"
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        WEATHER["function"]["parameters"])
    events = streamed(tiny, "/v1/chat/completions", req)
    calls = [d for e in events for d in e["choices"][0]["delta"].get("tool_calls", [])] \
        if events else []
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert calls[0]["function"] == call["function"] and calls[0]["index"] == 0


@pytest.fixture(scope="module")
def smol():
    s = Server(2, ["--draft", "lookup"])   # drafted tokens pass the grammar's mask too
    yield s
    s.kill()


def test_json_schema_and_json_object_answers_parse(smol):
    ask = "Give a person as JSON with a name and an age."
    req = {"messages": [{"role": "user", "content": ask}], "max_tokens": 60, "temperature": 0,
           "response_format": {"type": "json_schema", "json_schema": {
               "name": "person", "schema": PERSON}}}
    r = post(smol, "/v1/chat/completions", req)["choices"][0]
    assert r["finish_reason"] == "stop", r
    jsonschema.validate(json.loads(r["message"]["content"]), PERSON)
    events = streamed(smol, "/v1/chat/completions", req)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e[
        "choices"]) == r["message"]["content"]
    short = post(smol, "/v1/chat/completions", {**req, "max_tokens": 4})["choices"][0]
    assert short["finish_reason"] == "length"
    ask = "Reply with a JSON object whose only key is \"answer\" and whose value is 2+2."
    r = post(smol, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": ask}], "max_tokens": 60, "temperature": 0,
        "response_format": {"type": "json_object"}})["choices"][0]
    assert r["finish_reason"] == "stop", r
    assert isinstance(json.loads(r["message"]["content"]), dict)


def test_without_llguidance_constrained_requests_get_a_400_and_others_run(toolmodel):
    """llguidance is optional (a platform without its wheel): the server's modules import,
    a plain request binds, and response_format / a forced tool call get a 400 naming the
    fix."""
    code = f"""
import sys
sys.modules["llguidance"] = None          # as if it were not installed
from mpitpi.api import BadRequest, bind, parse_request
from mpitpi.grammar import Grammars
from mpitpi.tokenizer import load_tokenizer
tok = load_tokenizer({os.path.join(toolmodel[0], "tokenizer.json")!r})
g = Grammars(tok, 300, [2])
hi = [{{"role": "user", "content": "hi"}}]
bind(parse_request({{"messages": hi}}, True), tok, g, 300)
tools = [{WEATHER!r}]
for req, param in (({{"messages": hi, "response_format": {{"type": "json_object"}}}},
                    "response_format"),
                   ({{"messages": hi, "tools": tools, "tool_choice": "required"}}, "tools")):
    try:
        bind(parse_request(req, True), tok, g, 300)
    except BadRequest as e:
        assert e.status == 400 and e.body["error"]["param"] == param, e.body
        assert "pip install llguidance" in e.body["error"]["message"], e.body
    else:
        raise AssertionError("no 400")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
